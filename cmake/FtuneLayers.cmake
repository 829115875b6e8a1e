# One library per layer of DESIGN.md (dependencies point down only). A layer's sources are
# globbed from its folder, so adding a file needs no CMake edit; an empty layer makes no target.
function(ftune_add_layer name dir)
  file(GLOB _src CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/${dir}/*.cpp ${PROJECT_SOURCE_DIR}/${dir}/*/*.cpp)
  if(NOT _src)
    return()
  endif()
  add_library(${name} ${_src})
  target_link_libraries(${name} PUBLIC ${ARGN})
  target_compile_options(${name} PRIVATE ${FTUNE_WARNINGS})
endfunction()

# A gtest executable from tests/<dir>/*.cpp, when that folder has sources.
function(ftune_add_test_dir dir label)
  file(GLOB _src CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/${dir}/*.cpp)
  if(NOT _src)
    return()
  endif()
  add_executable(test_${dir} ${_src})
  target_link_libraries(test_${dir} PRIVATE ${ARGN} GTest::gtest GTest::gtest_main)
  target_compile_definitions(test_${dir} PRIVATE FTUNE_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  gtest_discover_tests(test_${dir} DISCOVERY_TIMEOUT 60 PROPERTIES LABELS "${label}")
endfunction()
